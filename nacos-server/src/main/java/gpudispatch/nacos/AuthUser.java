package gpudispatch.nacos;

import com.alibaba.nacos.auth.model.User;

/** A user the auth manager has identified: its name, the token it showed and whether it is an admin. */
public class AuthUser extends User {

    private static final long serialVersionUID = 1L;

    private String token;

    private boolean globalAdmin;

    public String getToken() {
        return token;
    }

    public void setToken(String token) {
        this.token = token;
    }

    public boolean isGlobalAdmin() {
        return globalAdmin;
    }

    public void setGlobalAdmin(boolean globalAdmin) {
        this.globalAdmin = globalAdmin;
    }

    @Override
    public String toString() {
        return "AuthUser{userName=" + getUserName() + ", globalAdmin=" + globalAdmin + "}";
    }
}
