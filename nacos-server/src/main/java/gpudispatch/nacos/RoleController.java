package gpudispatch.nacos;

import com.alibaba.nacos.auth.annotation.Secured;
import com.alibaba.nacos.auth.common.ActionTypes;
import com.alibaba.nacos.common.model.RestResult;
import com.alibaba.nacos.common.model.RestResultUtils;
import com.alibaba.nacos.config.server.auth.RoleInfo;
import com.alibaba.nacos.config.server.model.Page;
import java.util.List;
import org.springframework.beans.factory.annotation.Autowired;
import org.springframework.web.bind.annotation.DeleteMapping;
import org.springframework.web.bind.annotation.GetMapping;
import org.springframework.web.bind.annotation.PostMapping;
import org.springframework.web.bind.annotation.RequestMapping;
import org.springframework.web.bind.annotation.RequestParam;
import org.springframework.web.bind.annotation.RestController;

/**
 * Nacos's role API ({@code /nacos/v1/auth/roles}), admins only: give a user a role
 * ({@code POST role, username}), take it back ({@code DELETE role[, username]}), list
 * ({@code GET pageNo, pageSize[, username]}), search ({@code GET /search role}).
 */
@RestController("gpuDispatchRoleController")
@RequestMapping("/v1/auth/roles")
public class RoleController {

    @Autowired
    private UserStore store;

    @GetMapping
    @Secured(resource = UserStore.CONSOLE_RESOURCE_PREFIX + "roles", action = ActionTypes.READ)
    public Page<RoleInfo> getRoles(@RequestParam("pageNo") int pageNo, @RequestParam("pageSize") int pageSize,
            @RequestParam(name = "username", defaultValue = "") String username) {
        return store.rolesPage(username, pageNo, pageSize);
    }

    @GetMapping("/search")
    @Secured(resource = UserStore.CONSOLE_RESOURCE_PREFIX + "roles", action = ActionTypes.READ)
    public List<String> searchRoles(@RequestParam("role") String role) {
        return store.rolesLike(role);
    }

    @PostMapping
    @Secured(resource = UserStore.CONSOLE_RESOURCE_PREFIX + "roles", action = ActionTypes.WRITE)
    public RestResult<String> addRole(@RequestParam("role") String role, @RequestParam("username") String username) {
        store.addRole(role, username);
        return RestResultUtils.success("add role ok!");
    }

    @DeleteMapping
    @Secured(resource = UserStore.CONSOLE_RESOURCE_PREFIX + "roles", action = ActionTypes.WRITE)
    public RestResult<String> deleteRole(@RequestParam("role") String role,
            @RequestParam(name = "username", defaultValue = "") String username) {
        store.deleteRole(role, username);
        return RestResultUtils.success("delete role of user " + username + " ok!");
    }
}
